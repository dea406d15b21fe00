//! GET /api/v1/tokens/packages — the purchasable token packages.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::tokens::PACKAGES_FUNCTION)
}
