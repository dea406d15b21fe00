//! POST /api/v1/auth/access-token-hook — Supabase custom access token hook.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::auth_hook::FUNCTION)
}
