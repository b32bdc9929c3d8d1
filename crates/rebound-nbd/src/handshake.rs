//! Fixed newstyle negotiation: the server greets, the client sends options
//! until one of them (`EXPORT_NAME` or a successful `GO`) starts the
//! transmission phase. Every option gets an answer; only a broken framing
//! (bad magic, oversized data) closes the connection.

use crate::error::NbdError;
use crate::proto::*;
use crate::server::{Export, Server};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

/// Option data we read into memory; longer data is skipped and refused.
const MAX_OPTION_DATA: u32 = 64 << 10;
/// Beyond this an option is not worth skipping: the client is hostile or lost.
const MAX_OPTION_SKIP: u32 = 16 << 20;

pub(crate) struct Transmit {
    pub export: Arc<Export>,
    pub structured: bool,
    pub base_allocation: bool,
    pub flags: u16,
}

pub(crate) enum Outcome {
    Transmit(Transmit),
    Close,
}

/// Transmission flags for `export` given what was negotiated.
pub(crate) fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let caps = export.device.caps();
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH;
    if caps.read_only {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_FUA;
        if caps.trim {
            f |= TF_SEND_TRIM;
        }
        if caps.write_zeroes {
            f |= TF_SEND_WRITE_ZEROES;
            if caps.fast_zero {
                f |= TF_SEND_FAST_ZERO;
            }
        }
    }
    if caps.multi_conn {
        f |= TF_CAN_MULTI_CONN;
    }
    // We never fragment a read reply, so "don't fragment" is always honoured.
    if structured {
        f |= TF_SEND_DF;
    }
    f
}

async fn reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    typ: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let mut buf = Vec::with_capacity(20 + data.len());
    buf.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    buf.extend_from_slice(&opt.to_be_bytes());
    buf.extend_from_slice(&typ.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

async fn error_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    typ: u32,
    msg: &str,
) -> Result<(), NbdError> {
    debug!(option = opt, error = typ, msg, "option refused");
    reply(w, opt, typ, msg.as_bytes()).await
}

/// A cursor over option data that never reads past its end.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        if n > 4096 {
            return None;
        }
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// Parsed `NBD_OPT_INFO`/`GO` data: export name and requested info types.
fn parse_info(data: &[u8]) -> Option<(&str, Vec<u16>)> {
    let mut c = Cur(data);
    let name = c.string()?;
    let n = c.u16()?;
    let mut reqs = Vec::with_capacity(n as usize);
    for _ in 0..n {
        reqs.push(c.u16()?);
    }
    c.0.is_empty().then_some((name, reqs))
}

/// Parsed meta-context option data: export name and queries.
fn parse_meta(data: &[u8]) -> Option<(&str, Vec<&str>)> {
    let mut c = Cur(data);
    let name = c.string()?;
    let n = c.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(c.string()?);
    }
    c.0.is_empty().then_some((name, queries))
}

/// Does `query` select `base:allocation`? `list` allows the namespace
/// wildcard `base:`.
fn selects_base_allocation(query: &str, list: bool) -> bool {
    query == META_BASE_ALLOCATION || (list && query == "base:")
}

pub(crate) async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    server: &Server,
) -> Result<Outcome, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greeting).await?;
    w.flush().await?;

    let client_flags = r.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    let mut structured = false;
    // The export the last SET_META_CONTEXT applied to, and whether it selected
    // base:allocation. Contexts only count for that export.
    let mut meta: Option<(String, bool)> = None;

    loop {
        let magic = r.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(NbdError::Protocol(format!("bad option magic {magic:#x}")));
        }
        let opt = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > MAX_OPTION_DATA {
            if opt == OPT_EXPORT_NAME || len > MAX_OPTION_SKIP {
                return Err(NbdError::Protocol(format!(
                    "option {opt} with {len} bytes of data"
                )));
            }
            tokio::io::copy(&mut (&mut *r).take(len as u64), &mut tokio::io::sink()).await?;
            error_reply(w, opt, REP_ERR_TOO_BIG, "option data too large").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;

        match opt {
            OPT_EXPORT_NAME => {
                // No way to report an error here: the protocol says close.
                let Ok(name) = std::str::from_utf8(&data) else {
                    return Err(NbdError::Protocol("export name is not UTF-8".into()));
                };
                let Some(export) = server.find(name) else {
                    return Err(NbdError::Protocol(format!("unknown export {name:?}")));
                };
                let flags = transmission_flags(&export, structured);
                let mut buf = Vec::with_capacity(134);
                buf.extend_from_slice(&export.device.size().to_be_bytes());
                buf.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    buf.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&buf).await?;
                w.flush().await?;
                let base_allocation = meta.as_ref().is_some_and(|(n, sel)| {
                    *sel && server.find(n).is_some_and(|e| Arc::ptr_eq(&e, &export))
                });
                return Ok(Outcome::Transmit(Transmit {
                    export,
                    structured,
                    base_allocation,
                    flags,
                }));
            }
            OPT_ABORT => {
                // The client may already be gone; that is fine.
                let _ = reply(w, opt, REP_ACK, &[]).await;
                return Ok(Outcome::Close);
            }
            OPT_LIST => {
                if len != 0 {
                    error_reply(w, opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                for e in server.exports() {
                    let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    reply(w, opt, REP_SERVER, &d).await?;
                }
                reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS => {
                // TLS is not configured on this server; a TLS-capable build
                // would upgrade the stream here and restart negotiation.
                error_reply(
                    w,
                    opt,
                    REP_ERR_UNSUP,
                    "TLS is not configured on this server",
                )
                .await?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, reqs)) = parse_info(&data) else {
                    error_reply(w, opt, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data").await?;
                    continue;
                };
                let Some(export) = server.find(name) else {
                    error_reply(
                        w,
                        opt,
                        REP_ERR_UNKNOWN,
                        &format!("no export named {name:?}"),
                    )
                    .await?;
                    continue;
                };
                let flags = transmission_flags(&export, structured);
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&export.device.size().to_be_bytes());
                info.extend_from_slice(&flags.to_be_bytes());
                reply(w, opt, REP_INFO, &info).await?;
                // Always advertised: our constraints are no stricter than the
                // defaults, so a client that ignores them stays correct.
                let mut bs = Vec::with_capacity(14);
                bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                bs.extend_from_slice(&MIN_BLOCK.to_be_bytes());
                bs.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                bs.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                reply(w, opt, REP_INFO, &bs).await?;
                if reqs.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(export.name.as_bytes());
                    reply(w, opt, REP_INFO, &d).await?;
                }
                if reqs.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
                    let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(export.description.as_bytes());
                    reply(w, opt, REP_INFO, &d).await?;
                }
                reply(w, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    let base_allocation = meta.as_ref().is_some_and(|(n, sel)| {
                        *sel && server.find(n).is_some_and(|e| Arc::ptr_eq(&e, &export))
                    });
                    return Ok(Outcome::Transmit(Transmit {
                        export,
                        structured,
                        base_allocation,
                        flags,
                    }));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    error_reply(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                    continue;
                }
                structured = true;
                reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let list = opt == OPT_LIST_META_CONTEXT;
                if !list {
                    // SET replaces the selection even when it fails.
                    meta = None;
                }
                if !structured {
                    error_reply(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        "negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                let Some((name, queries)) = parse_meta(&data) else {
                    error_reply(w, opt, REP_ERR_INVALID, "malformed meta context data").await?;
                    continue;
                };
                let Some(export) = server.find(name) else {
                    error_reply(
                        w,
                        opt,
                        REP_ERR_UNKNOWN,
                        &format!("no export named {name:?}"),
                    )
                    .await?;
                    continue;
                };
                if queries.iter().any(|q| !q.contains(':')) {
                    error_reply(w, opt, REP_ERR_INVALID, "a query lacks its namespace").await?;
                    continue;
                }
                let available = export.device.caps().block_status;
                let selected = available
                    && if list && queries.is_empty() {
                        true
                    } else {
                        queries.iter().any(|q| selects_base_allocation(q, list))
                    };
                if selected {
                    let id = if list { 0 } else { META_BASE_ALLOCATION_ID };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                    reply(w, opt, REP_META_CONTEXT, &d).await?;
                }
                if !list {
                    meta = Some((name.to_string(), selected));
                }
                reply(w, opt, REP_ACK, &[]).await?;
            }
            other => {
                error_reply(w, other, REP_ERR_UNSUP, "option not supported").await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_parsers_reject_short_and_trailing_data() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(parse_info(&d), Some(("abc", vec![INFO_NAME])));
        assert_eq!(parse_info(&d[..d.len() - 1]), None);
        let mut longer = d.clone();
        longer.push(0);
        assert_eq!(parse_info(&longer), None);
        // A name length pointing past the end.
        let mut bad = 100u32.to_be_bytes().to_vec();
        bad.extend_from_slice(b"abc");
        assert_eq!(parse_info(&bad), None);

        let mut m = Vec::new();
        m.extend_from_slice(&0u32.to_be_bytes());
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(b"base:allocation");
        assert_eq!(parse_meta(&m), Some(("", vec!["base:allocation"])));
        assert_eq!(parse_meta(&m[..m.len() - 2]), None);
    }

    #[test]
    fn meta_queries() {
        assert!(selects_base_allocation("base:allocation", false));
        assert!(!selects_base_allocation("base:", false));
        assert!(selects_base_allocation("base:", true));
        assert!(!selects_base_allocation("qemu:dirty-bitmap:x", true));
    }
}
