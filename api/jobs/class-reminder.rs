//! POST /api/jobs/class-reminder — QStash callback: a class reminder.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::jobs::CLASS_REMINDER)
}
