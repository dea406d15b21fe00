//! POST /api/v1/calls/{id}/token — the caller's Agora RTC token for the call.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::calls::TOKEN)
}
