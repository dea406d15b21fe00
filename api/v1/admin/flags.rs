//! GET and POST /api/v1/admin/flags — admins list and create feature flags (audited).
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::flags::COLLECTION)
}
