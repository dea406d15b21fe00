//! POST /api/v1/admin/users/{id}/grants — admins grant promotional tokens (audited).
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::grants::FUNCTION)
}
