//! GET /api/v1/openapi.json — the OpenAPI 3.1 document (vercel.json rewrites /api/v1/openapi.json here).
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::openapi::FUNCTION)
}
