//! POST /api/webhooks/agora — Agora's channel events of paid calls (signed, each noticeId once).
fn main() -> std::process::ExitCode {
    stagepass_platform::serve::run(stagepass_routes::webhooks::AGORA)
}
