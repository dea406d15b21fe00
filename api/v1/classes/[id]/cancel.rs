//! POST /api/v1/classes/{id}/cancel — the creator cancels; every fan is refunded.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::classes::CANCEL)
}
