//! GET /api/cron/deliver-outbox — Vercel Cron: delivers what was not delivered after its request.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::cron::DELIVER_OUTBOX)
}
