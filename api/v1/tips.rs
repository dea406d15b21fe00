//! POST /api/v1/tips — tip a creator (idempotent).
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::tips::FUNCTION)
}
