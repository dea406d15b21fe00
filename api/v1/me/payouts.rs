//! GET /api/v1/me/payouts — the creator's payout history.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::payouts::HISTORY)
}
