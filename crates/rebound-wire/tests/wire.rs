#![allow(clippy::unwrap_used)]
//! Handshake, corruption and compression behaviour over real sockets.

use proptest::prelude::*;
use rebound_types::{Coded, ErrorCode};
use rebound_wire::*;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

fn token(s: &str) -> Token {
    Token::new(s).unwrap()
}

fn pair_handshake(
    client_token: &str,
    server_token: &str,
    client_versions: (u16, u16),
) -> (Result<Handshake, WireError>, Result<Handshake, WireError>) {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let st = token(server_token);
    let server = std::thread::spawn(move || {
        server_handshake(&mut b, &st, (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION))
    });
    let c = client_handshake(&mut a, &token(client_token), client_versions);
    drop(a);
    (c, server.join().unwrap())
}

#[test]
fn same_token_agrees_on_a_session_key() {
    let (c, s) = pair_handshake("a-long-enough-token", "a-long-enough-token", (1, 1));
    let (c, s) = (c.unwrap(), s.unwrap());
    assert_eq!(c.version, 1);
    assert_eq!(c.session_key, s.session_key);
}

#[test]
fn wrong_token_is_refused_on_both_sides() {
    let (c, s) = pair_handshake("a-long-enough-token", "another-long-token!", (1, 1));
    assert_eq!(c.unwrap_err().code(), ErrorCode::AuthFailed);
    assert_eq!(s.unwrap_err().code(), ErrorCode::AuthFailed);
}

#[test]
fn other_version_gets_a_clear_refusal() {
    let (c, s) = pair_handshake("a-long-enough-token", "a-long-enough-token", (7, 9));
    let c = c.unwrap_err();
    assert_eq!(c.code(), ErrorCode::VersionMismatch);
    assert!(c.to_string().contains("7..=9"), "{c}");
    assert_eq!(s.unwrap_err().code(), ErrorCode::VersionMismatch);
}

#[test]
fn short_tokens_are_rejected() {
    assert!(Token::new("short").is_err());
    assert_eq!(
        format!("{:?}", token("a-long-enough-token")),
        "Token(<redacted>)"
    );
}

#[test]
fn a_flipped_bit_anywhere_is_detected() {
    let frame = encode_frame(
        &Msg::Data {
            offset: 8192,
            bytes: vec![0x5a; 3000].into(),
        },
        Compression::None,
    );
    for i in 0..frame.len() {
        let mut bad = frame.clone();
        bad[i] ^= 0x10;
        let r = read_frame(&mut bad.as_slice());
        assert!(r.is_err(), "flip at byte {i} went unnoticed");
    }
}

#[test]
fn truncation_is_a_close_in_the_middle() {
    let frame = encode_frame(&Msg::Durable { chunks: 1 }, Compression::None);
    let e = read_frame(&mut &frame[..frame.len() - 1]).unwrap_err();
    assert_eq!(e.code(), ErrorCode::PeerClosed);
    assert!(e.to_string().contains("inside a frame"), "{e}");
    let e = read_frame(&mut &frame[..0]).unwrap_err();
    assert!(e.to_string().contains("between frames"), "{e}");
}

#[test]
fn oversized_length_is_refused_before_allocating() {
    let mut frame = encode_frame(&Msg::Durable { chunks: 1 }, Compression::None);
    frame[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        read_frame(&mut frame.as_slice()).unwrap_err().code(),
        ErrorCode::FrameTooLarge
    );
}

#[test]
fn compression_round_trips_and_shrinks_text() {
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog. "
        .iter()
        .cycle()
        .take(64 << 10)
        .copied()
        .collect();
    for c in [Compression::Lz4, Compression::Zstd, Compression::None] {
        let msg = Msg::Data {
            offset: 1 << 20,
            bytes: text.clone().into(),
        };
        let frame = encode_frame(&msg, c);
        if c != Compression::None {
            assert!(
                frame.len() < text.len() / 4,
                "{c:?} gave {} bytes",
                frame.len()
            );
        }
        assert_eq!(read_frame(&mut frame.as_slice()).unwrap().0, msg);
    }
}

#[test]
fn threaded_halves_keep_order_and_count_bytes() {
    let (a, b) = UnixStream::pair().unwrap();
    let sent = Arc::new(Counters::default());
    let recvd = Arc::new(Counters::default());
    let mut w = spawn_writer(a, Compression::Lz4, 3, sent.clone());
    let r = spawn_reader(b, recvd.clone());
    for i in 0..500u64 {
        let bytes = vec![(i % 251) as u8; (i as usize * 37) % 9000];
        w.send(Msg::Data {
            offset: i,
            bytes: bytes.into(),
        })
        .unwrap();
    }
    w.close().unwrap();
    for i in 0..500u64 {
        match r.recv().unwrap() {
            Msg::Data { offset, bytes } => {
                assert_eq!(offset, i);
                assert_eq!(bytes.len(), (i as usize * 37) % 9000);
            }
            m => panic!("unexpected {m:?}"),
        }
    }
    assert_eq!(r.recv().unwrap_err().code(), ErrorCode::PeerClosed);
    assert_eq!(sent.sent(), recvd.received());
}

proptest! {
    /// Whatever bytes arrive, decoding returns an error or a message: no panic.
    #[test]
    fn decoding_garbage_never_panics(tag in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Msg::decode(tag, &body);
        let mut framed = body.clone();
        let _ = read_frame(&mut framed.as_slice());
        framed.truncate(0);
    }

    #[test]
    fn every_message_round_trips(offset in any::<u64>(), len in any::<u64>(), hs in proptest::collection::vec(any::<u128>(), 0..70)) {
        for msg in [
            Msg::Zero { offset, len },
            Msg::NodeHashes { chunk: offset, hashes: hs.clone() },
            Msg::LeafHashes { chunk: len, mask: offset, hashes: hs.clone() },
            Msg::ChunkEnd { chunk: offset, blake3: [len as u8; 32] },
            Msg::Finished { root: [1; 32], stats: SyncStats { bytes_read: offset, bytes_written: len, bytes_zeroed: 3 } },
            Msg::Opened(Opened { size: len, session: [9; 16], resume_chunks: offset }),
        ] {
            let f = encode_frame(&msg, Compression::Zstd);
            prop_assert_eq!(read_frame(&mut f.as_slice()).unwrap().0, msg);
        }
    }
}
