//! GET /api/v1/me/calls — the caller's calls, newest first.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::calls::MY_CALLS)
}
