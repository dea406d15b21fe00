use std::sync::Arc;

use axum::extract::FromRef;
use sqlx::PgPool;
use stagepass_platform::auth::Verifier;
use stagepass_platform::config::{AuthConfig, DbConfig, Loader};
use stagepass_platform::flags::{FlagCache, FlagsConfig};
use stagepass_platform::serve::{PlatformHandle, Resources};

use crate::outbox::Outbox;

/// What a route serving signed-in users needs: the pool and the token
/// verifier, the process's feature flags, and for routes whose changes
/// notify someone, the outbox deliverer.
#[derive(Clone)]
pub struct UserApi {
    pub pool: PgPool,
    pub verifier: Arc<Verifier>,
    pub flags: Arc<FlagCache>,
    pub outbox: Option<Outbox>,
}

impl UserApi {
    pub fn load(l: &mut Loader, r: &Resources) -> Option<UserApi> {
        let db = DbConfig::load(l);
        let auth = AuthConfig::load(l);
        let flags = FlagsConfig::load(l);
        let pool = r.db(&db?)?;
        Some(UserApi {
            flags: r.flags(&pool, flags),
            pool,
            verifier: r.verifier(&auth?),
            outbox: None,
        })
    }

    /// [`UserApi::load`] plus the outbox (Ably and QStash settings).
    pub fn load_emitting(l: &mut Loader, r: &Resources) -> Option<UserApi> {
        let api = UserApi::load(l, r);
        let outbox = Outbox::load(l, r, api.as_ref().map(|a| a.pool.clone()));
        Some(UserApi {
            outbox: Some(outbox?),
            ..api?
        })
    }

    /// After a committed change: deliver its messages once the response is
    /// sent.
    pub fn kick(&self, platform: &PlatformHandle) {
        if let Some(outbox) = &self.outbox {
            outbox.kick(platform);
        }
    }

    /// After a committed change that gave `users` deferred credits (ADR
    /// 0021): fold their wallets, then deliver, once the response is sent.
    pub fn fold_then_kick(&self, platform: &PlatformHandle, users: &[uuid::Uuid]) {
        if let Some(outbox) = &self.outbox {
            outbox.fold_then_kick(platform, users);
        }
    }
}

impl FromRef<UserApi> for Arc<Verifier> {
    fn from_ref(s: &UserApi) -> Arc<Verifier> {
        s.verifier.clone()
    }
}

impl FromRef<UserApi> for Arc<FlagCache> {
    fn from_ref(s: &UserApi) -> Arc<FlagCache> {
        s.flags.clone()
    }
}
