//! POST /api/v1/calls — a fan asks a creator for a paid call (idempotent).
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::calls::REQUEST)
}
