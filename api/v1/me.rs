//! GET and PATCH /api/v1/me — the authoritative session.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::me::FUNCTION)
}
