//! POST /api/jobs/payout-transfer — one creator's Stripe transfer (QStash).
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::payouts::JOB)
}
