//! Lua script shebang flags Upstash accepts but open-source Redis refuses.
//!
//! `@upstash/ratelimit` 2.x starts its scripts with
//! `#!lua flags=allow-key-locking`; Upstash runs them, Redis 7 answers
//! "ERR Unexpected flag in script shebang". The shim drops flags Redis does
//! not know before forwarding `EVAL` / `SCRIPT LOAD`, and, since that
//! changes the script's SHA-1, remembers which SHA-1 the client knows the
//! script by, so the client's `EVALSHA` still finds it (one round trip, as
//! on Upstash).

use std::collections::HashMap;
use std::sync::Mutex;

use sha1::Digest as _;

/// The shebang flags Redis 7 understands.
const REDIS_FLAGS: [&str; 5] = [
    "no-writes",
    "allow-oom",
    "allow-stale",
    "no-cluster",
    "allow-cross-slot-keys",
];
/// SHA-1 translations kept at most (cleared when full; a client then gets
/// one NOSCRIPT and sends the script again).
const MAX_SCRIPTS: usize = 1000;

#[derive(Default)]
pub struct Scripts {
    /// The client's SHA-1 → the SHA-1 Redis knows the rewritten script by.
    rewritten: Mutex<HashMap<String, String>>,
}

pub fn sha1_hex(bytes: &[u8]) -> String {
    sha1::Sha1::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Scripts {
    /// Rewrites `command` in place where needed; returns the client's SHA-1
    /// of a rewritten `SCRIPT LOAD`, whose reply must name that SHA-1.
    pub fn rewrite(&self, command: &mut [Vec<u8>]) -> Option<String> {
        let name = String::from_utf8_lossy(command.first()?).to_ascii_uppercase();
        match name.as_str() {
            "EVAL" | "EVAL_RO" => {
                self.strip(command.get_mut(1)?);
                None
            }
            "SCRIPT" if command.get(1)?.eq_ignore_ascii_case(b"LOAD") => {
                self.strip(command.get_mut(2)?)
            }
            "EVALSHA" | "EVALSHA_RO" => {
                let sha = command.get_mut(1)?;
                let known = String::from_utf8_lossy(sha).to_ascii_lowercase();
                if let Some(redis_sha) = self.lookup(&known) {
                    *sha = redis_sha.into_bytes();
                }
                None
            }
            _ => None,
        }
    }

    fn lookup(&self, sha: &str) -> Option<String> {
        self.rewritten.lock().ok()?.get(sha).cloned()
    }

    /// Drops unknown shebang flags from `script`; returns the original
    /// SHA-1 when it changed anything.
    fn strip(&self, script: &mut Vec<u8>) -> Option<String> {
        let rewritten = strip_flags(script)?;
        let original = sha1_hex(script);
        let new = sha1_hex(&rewritten);
        *script = rewritten;
        if let Ok(mut map) = self.rewritten.lock() {
            if map.len() >= MAX_SCRIPTS {
                map.clear();
            }
            map.insert(original.clone(), new);
        }
        Some(original)
    }
}

/// The script without flags Redis does not know, or `None` if it has none.
fn strip_flags(script: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(script).ok()?;
    let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
    let shebang = first.strip_prefix("#!")?;
    let mut parts = shebang.split_whitespace();
    let engine = parts.next()?;
    let mut kept = Vec::new();
    let mut changed = false;
    let mut others = Vec::new();
    for part in parts {
        match part.strip_prefix("flags=") {
            Some(flags) => {
                for flag in flags.split(',').filter(|f| !f.is_empty()) {
                    if REDIS_FLAGS.contains(&flag) {
                        kept.push(flag);
                    } else {
                        changed = true;
                    }
                }
            }
            None => others.push(part),
        }
    }
    if !changed {
        return None;
    }
    let mut line = format!("#!{engine}");
    for other in others {
        line.push(' ');
        line.push_str(other);
    }
    if !kept.is_empty() {
        line.push_str(" flags=");
        line.push_str(&kept.join(","));
    }
    Some(format!("{line}\n{rest}").into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_only_flags_redis_refuses() {
        let s = b"#!lua flags=allow-key-locking\nreturn 1".to_vec();
        assert_eq!(strip_flags(&s).unwrap(), b"#!lua\nreturn 1");
        let s = b"#!lua flags=no-writes,allow-key-locking\nreturn 1".to_vec();
        assert_eq!(strip_flags(&s).unwrap(), b"#!lua flags=no-writes\nreturn 1");
        assert!(strip_flags(b"#!lua flags=no-writes\nreturn 1").is_none());
        assert!(strip_flags(b"return 1").is_none());
    }

    #[test]
    fn evalsha_finds_a_rewritten_script_by_its_original_digest() {
        let scripts = Scripts::default();
        let source = b"#!lua flags=allow-key-locking\nreturn 1".to_vec();
        let original = sha1_hex(&source);
        let mut eval = vec![b"EVAL".to_vec(), source, b"0".to_vec()];
        assert_eq!(scripts.rewrite(&mut eval), None);
        assert_eq!(eval[1], b"#!lua\nreturn 1");
        let mut evalsha = vec![b"evalsha".to_vec(), original.into_bytes(), b"0".to_vec()];
        scripts.rewrite(&mut evalsha);
        assert_eq!(evalsha[1], sha1_hex(b"#!lua\nreturn 1").into_bytes());
    }
}
