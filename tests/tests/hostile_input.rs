//! Hostile input against real server processes: bytes no well-behaved
//! client would send, and names far longer than any valid one. Each must
//! be refused as the caller's fault (`InvalidArgument`) with a short
//! message, never `Internal` and never an echo of the input.

#![allow(clippy::unwrap_used)]

use duplex_tests::accounts;
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
