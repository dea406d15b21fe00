//! POST /api/v1/calls/{id}/{accept,decline,cancel,join,heartbeat,hang-up} — a party acts on a call.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::calls::ACTION)
}
