//! Version negotiation and mutual authentication.
//!
//! ```text
//! client                                   server
//!   Hello{magic, min, max, nonce_c}   ──>
//!                                     <──  Challenge{version, nonce_s}   (or Error 1102)
//!   Auth{proof_c}                     ──>
//!                                     <──  Welcome{proof_s}              (or Error 1101)
//! ```
//!
//! Proofs are BLAKE3 keyed hashes, under a key derived from the shared token,
//! of the role, both nonces and the version: the token never crosses the
//! wire, a proof cannot be replayed on another connection, and the client
//! knows it talks to a server holding the token too. Both sides then derive
//! a per-connection session key (the delta engine keys its hashes with it).
//! The Hello and Challenge frames keep this layout in every version so that
//! any two releases can at least tell each other which versions they speak.

use crate::{Compression, Msg, WireError, encode_frame, read_frame};
use rebound_types::ErrorCode;
use std::io::{Read, Write};
use std::path::Path;

pub const HELLO_MAGIC: [u8; 8] = *b"REBOUND\x01";
/// Shortest token accepted: shorter ones are too easy to guess.
pub const MIN_TOKEN_LEN: usize = 16;

/// A shared secret. Its bytes never reach a log: `Debug` is redacted.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// A token from its text; surrounding whitespace is ignored.
    pub fn new(text: &str) -> Result<Token, String> {
        let t = text.trim();
        if t.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "a token must have at least {MIN_TOKEN_LEN} characters"
            ));
        }
        Ok(Token(t.as_bytes().to_vec()))
    }

    /// Read a token file (first line used, whitespace trimmed).
    pub fn from_file(path: &Path) -> Result<Token, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Token::new(text.lines().next().unwrap_or(""))
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    fn key(&self) -> [u8; 32] {
        blake3::derive_key("rebound wire token 2026-11 v1", &self.0)
    }
}

/// The outcome of a successful handshake.
#[derive(Clone, Debug)]
pub struct Handshake {
    pub version: u16,
    /// Secret to both peers and to nobody else (derived from the token and both nonces).
    pub session_key: [u8; 32],
}

fn nonce() -> Result<[u8; 32], WireError> {
    let mut n = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .map_err(|e| WireError::Io {
            during: "reading /dev/urandom",
            source: e,
        })?;
    Ok(n)
}

fn proof(key: &[u8; 32], role: &[u8], nc: &[u8; 32], ns: &[u8; 32], version: u16) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(role)
        .update(nc)
        .update(ns)
        .update(&version.to_le_bytes());
    h.finalize()
}

fn session_key(key: &[u8; 32], nc: &[u8; 32], ns: &[u8; 32]) -> [u8; 32] {
    *proof(key, b"session", nc, ns, 0).as_bytes()
}

fn send(s: &mut impl Write, msg: &Msg) -> Result<(), WireError> {
    s.write_all(&encode_frame(msg, Compression::None))
        .and_then(|_| s.flush())
        .map_err(|e| WireError::io("during the handshake", e))
}

fn recv(s: &mut impl Read) -> Result<Msg, WireError> {
    read_frame(s).map(|(m, _)| m)
}

fn refuse(s: &mut impl Write, code: ErrorCode, message: &str) {
    // Best effort: the peer may already be gone.
    let _ = send(
        s,
        &Msg::Error {
            code: code.number(),
            message: message.to_string(),
        },
    );
}

/// Run the client side. `versions` is the inclusive range this side speaks.
pub fn client_handshake<S: Read + Write>(
    s: &mut S,
    token: &Token,
    versions: (u16, u16),
) -> Result<Handshake, WireError> {
    let nc = nonce()?;
    send(
        s,
        &Msg::Hello {
            magic: HELLO_MAGIC,
            min_version: versions.0,
            max_version: versions.1,
            nonce: nc,
        },
    )?;
    let (version, ns) = match recv(s)? {
        Msg::Challenge { version, nonce } => (version, nonce),
        Msg::Error { code, message } => return Err(remote_refusal(code, message)),
        other => {
            return Err(WireError::Protocol(format!(
                "expected challenge, got {}",
                other.name()
            )));
        }
    };
    if version < versions.0 || version > versions.1 {
        return Err(WireError::Protocol(format!(
            "server chose version {version}, outside what we offered"
        )));
    }
    let key = token.key();
    send(
        s,
        &Msg::Auth {
            proof: *proof(&key, b"client", &nc, &ns, version).as_bytes(),
        },
    )?;
    match recv(s)? {
        Msg::Welcome { proof: p } => {
            if blake3::Hash::from(p) != proof(&key, b"server", &nc, &ns, version) {
                return Err(WireError::Auth(
                    "the server could not prove it holds the token".into(),
                ));
            }
        }
        Msg::Error { code, message } => return Err(remote_refusal(code, message)),
        other => {
            return Err(WireError::Protocol(format!(
                "expected welcome, got {}",
                other.name()
            )));
        }
    }
    Ok(Handshake {
        version,
        session_key: session_key(&key, &nc, &ns),
    })
}

fn remote_refusal(code: u32, message: String) -> WireError {
    match ErrorCode::from_number(code) {
        Some(ErrorCode::AuthFailed) => WireError::Auth(format!("the server refused: {message}")),
        _ => WireError::Remote { code, message },
    }
}

/// Run the server side. On failure the client has been told why.
pub fn server_handshake<S: Read + Write>(
    s: &mut S,
    token: &Token,
    versions: (u16, u16),
) -> Result<Handshake, WireError> {
    let (magic, min, max, nc) = match recv(s)? {
        Msg::Hello {
            magic,
            min_version,
            max_version,
            nonce,
        } => (magic, min_version, max_version, nonce),
        other => {
            refuse(s, ErrorCode::ProtocolViolation, "expected hello");
            return Err(WireError::Protocol(format!(
                "expected hello, got {}",
                other.name()
            )));
        }
    };
    if magic != HELLO_MAGIC {
        refuse(s, ErrorCode::ProtocolViolation, "not a rebound peer");
        return Err(WireError::Protocol(
            "the peer is not a rebound peer (bad magic)".into(),
        ));
    }
    let version = versions.1.min(max);
    if version < versions.0.max(min) {
        let err = WireError::Version {
            ours_min: versions.0,
            ours_max: versions.1,
            theirs_min: min,
            theirs_max: max,
        };
        refuse(s, ErrorCode::VersionMismatch, &err.to_string());
        return Err(err);
    }
    let ns = nonce()?;
    send(s, &Msg::Challenge { version, nonce: ns })?;
    let key = token.key();
    match recv(s)? {
        Msg::Auth { proof: p } => {
            if blake3::Hash::from(p) != proof(&key, b"client", &nc, &ns, version) {
                refuse(s, ErrorCode::AuthFailed, "wrong token");
                return Err(WireError::Auth("the client's token is wrong".into()));
            }
        }
        other => {
            refuse(s, ErrorCode::ProtocolViolation, "expected auth");
            return Err(WireError::Protocol(format!(
                "expected auth, got {}",
                other.name()
            )));
        }
    }
    send(
        s,
        &Msg::Welcome {
            proof: *proof(&key, b"server", &nc, &ns, version).as_bytes(),
        },
    )?;
    Ok(Handshake {
        version,
        session_key: session_key(&key, &nc, &ns),
    })
}
