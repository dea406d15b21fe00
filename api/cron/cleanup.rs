//! GET /api/cron/cleanup — Vercel Cron: remove expired idempotency records.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::cron::CLEANUP)
}
