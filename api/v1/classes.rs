//! GET, POST /api/v1/classes — upcoming classes; a creator creates one.
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::classes::COLLECTION)
}
