//! GET /api/v1/creators/{id}/call-settings — a creator's public call settings.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::calls::CREATOR_SETTINGS)
}
