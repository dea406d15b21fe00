//! GET /api/v1/calls/{id} — one call, to either party.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::calls::ITEM)
}
