use std::sync::Arc;

use axum::extract::FromRef;
use sqlx::PgPool;
use stagepass_platform::auth::Verifier;
use stagepass_platform::config::{AuthConfig, DbConfig, Loader};
use stagepass_platform::serve::Resources;

/// What a route serving signed-in users needs: the pool and the token
/// verifier.
#[derive(Clone)]
pub struct UserApi {
    pub pool: PgPool,
    pub verifier: Arc<Verifier>,
}

impl UserApi {
    pub fn load(l: &mut Loader, r: &Resources) -> Option<UserApi> {
        let db = DbConfig::load(l);
        let auth = AuthConfig::load(l);
        let pool = r.db(&db?)?;
        Some(UserApi {
            pool,
            verifier: r.verifier(&auth?),
        })
    }
}

impl FromRef<UserApi> for Arc<Verifier> {
    fn from_ref(s: &UserApi) -> Arc<Verifier> {
        s.verifier.clone()
    }
}
