//! Hostile input against real server processes: bytes no well-behaved
//! client would send, and names far longer than any valid one. Each must
//! be refused as the caller's fault (`InvalidArgument`) with a short
//! message, never `Internal` and never an echo of the input.

#![allow(clippy::unwrap_used)]

use duplex_tests::accounts::{self, account, admin, register_storage};
use duplex_tests::runtime;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Sends a body as given, so a test can put bytes on the wire that no
/// generated client would encode; the answer, if any, is ignored.
#[derive(Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        use prost::bytes::Buf;
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// A `CreateAccountRequest` whose `name` (field 1, a string) is not UTF-8.
fn create_account_with_invalid_utf8() -> Vec<u8> {
    let name = [0xff, 0xfe, b'x'];
    let mut body = vec![0x0a, name.len() as u8];
    body.extend_from_slice(&name);
    body
}

#[test]
fn invalid_utf8_is_an_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let server = accounts::start(dir.path(), "account-a", &[]);
    let status = rt.block_on(async {
        let channel = duplex_rpc::channel(&server.addr).unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static("/duplex.v1.AccountAdmin/CreateAccount");
        grpc.unary(
            tonic::Request::new(create_account_with_invalid_utf8()),
            path,
            RawCodec,
        )
        .await
        .expect_err("a name that is not UTF-8 is refused")
    });
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let message = status.message();
    assert!(
        message.contains("duplex.v1.AccountAdmin/CreateAccount"),
        "{message}"
    );
    assert!(message.contains("UTF-8"), "{message}");
}

#[test]
fn a_huge_name_is_refused_without_being_echoed() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let server = accounts::start(dir.path(), "account-a", &[]);
    let huge = "n".repeat(1 << 20);
    rt.block_on(async {
        register_storage(&server.addr).await;
        // 1 MiB is under tonic's 4 MiB decode limit, so the name reaches
        // the handler's validation, whose message must not carry it back.
        let mut client = admin(&server.addr);
        let by_name = client
            .create_account(account(&huge))
            .await
            .expect_err("a 1 MiB account name is refused");
        let mut grouped = account("fine");
        grouped.group = huge.clone();
        let by_group = client
            .create_account(grouped)
            .await
            .expect_err("a 1 MiB group name is refused");
        for status in [by_name, by_group] {
            assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
            assert!(
                status.message().len() < 1024,
                "the error echoes {} bytes",
                status.message().len()
            );
        }
    });
}
