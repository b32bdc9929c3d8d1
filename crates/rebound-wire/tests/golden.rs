#![allow(clippy::unwrap_used)]
//! Golden bytes: the encoding of frames and messages is a contract between
//! releases. If one of these fails, you changed the wire format: bump
//! PROTOCOL_VERSION and update the bytes deliberately.

use rebound_wire::*;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn version_is_pinned() {
    assert_eq!(
        PROTOCOL_VERSION, 1,
        "bumping the version? update the golden bytes below"
    );
}

#[test]
fn golden_frames() {
    let cases: Vec<(Msg, &str)> = vec![
        (
            Msg::Durable { chunks: 7 },
            "08000000330000000800000060569f5e0700000000000000",
        ),
        (
            Msg::Zero {
                offset: 4096,
                len: 8192,
            },
            "100000003100000010000000f913a2e000100000000000000020000000000000",
        ),
        (
            Msg::Error {
                code: 1101,
                message: "no".into(),
            },
            "0a000000050000000a00000052fe328d4d040000020000006e6f",
        ),
        (
            Msg::WantLeaves {
                chunk: 1,
                mask: 0x8000_0000_0000_0001,
            },
            "10000000230000001000000045ca617401000000000000000100000000000080",
        ),
        (
            Msg::TopHashes {
                first_chunk: 2,
                hashes: vec![0, 1],
            },
            "2c000000200000002c000000549b9f900200000000000000020000000000000000000000000000000000000001000000000000000000000000000000",
        ),
    ];
    for (msg, want) in cases {
        let got = hex(&encode_frame(&msg, Compression::None));
        assert_eq!(got, want, "frame of {msg:?}");
        let (back, n) = read_frame(&mut got_bytes(&got).as_slice()).unwrap();
        assert_eq!(back, msg);
        assert_eq!(n, want.len() / 2);
    }
}

fn got_bytes(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn golden_open() {
    let msg = Msg::Open(Open {
        mode: Mode::Push,
        name: "vm/disk0".into(),
        source_size: 1 << 30,
        full: false,
        dry_run: true,
        allow_shrink: false,
        resume_session: [0xab; 16],
        resume_chunks: 3,
    });
    let (tag, body) = msg.encode();
    assert_eq!(tag, 0x10);
    assert_eq!(
        hex(&body),
        "0008000000766d2f6469736b300000004000000000000100abababababababababababababababab0300000000000000"
    );
    assert_eq!(Msg::decode(tag, &body).unwrap(), msg);
}
