//! POST /api/v1/realtime/token — an Ably token with server-decided capabilities.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::realtime::FUNCTION)
}
