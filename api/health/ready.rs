//! GET /api/health/ready — database readiness.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::health::READY)
}
