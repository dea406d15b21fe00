//! DELETE /api/v1/classes/{id}/enrollments/me — withdraw with a refund until the cut-off.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::classes::ENROLLMENT_ME)
}
