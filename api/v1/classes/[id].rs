//! GET, PATCH /api/v1/classes/{id} — one class; its creator edits it.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::classes::ITEM)
}
