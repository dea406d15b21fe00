//! GET /api/health — liveness.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::health::HEALTH)
}
