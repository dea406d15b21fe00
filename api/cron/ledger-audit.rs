//! GET /api/cron/ledger-audit — Vercel Cron: check every ledger invariant.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::cron::LEDGER_AUDIT)
}
