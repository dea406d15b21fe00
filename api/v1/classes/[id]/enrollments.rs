//! POST /api/v1/classes/{id}/enrollments — enrol, paying into escrow (idempotent).
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::classes::ENROLLMENTS)
}
