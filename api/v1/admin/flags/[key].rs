//! GET and PATCH /api/v1/admin/flags/{key} — admins read and change a feature flag (audited).
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::flags::ITEM)
}
