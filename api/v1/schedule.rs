//! GET /api/v1/schedule — the caller's calendar events in a range.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::schedule::FUNCTION)
}
