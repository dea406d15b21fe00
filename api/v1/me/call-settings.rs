//! GET/PUT /api/v1/me/call-settings — a creator's price per minute and which calls they take.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::calls::SETTINGS)
}
