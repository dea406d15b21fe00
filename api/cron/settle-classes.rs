//! GET /api/cron/settle-classes — Vercel Cron: pay ended classes' escrow to creators.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::cron::SETTLE_CLASSES)
}
