//! POST /api/jobs/call-tick — advance one call at a precise moment (QStash).
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::jobs::CALL_TICK)
}
