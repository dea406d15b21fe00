//! GET /api/cron/payouts — the payout run (02:00 UTC on the 1st and 15th) and reconciliation.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::payouts::CRON)
}
