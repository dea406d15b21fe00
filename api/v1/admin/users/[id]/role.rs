//! PUT /api/v1/admin/users/{id}/role — admins change a user's role (audited).
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::admin::ROLE)
}
