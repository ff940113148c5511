// KeySet: keys by kid, rotation, RS256/ES256 from PEM and JWKS, and the tokens it refuses. The
// tokens of other signers are made with OpenSSL directly (jwt_keys.hpp), not with pushbook.
#include <pushbook/auth.hpp>

#include "jwt_keys.hpp"
#include "temp_dir.hpp"

#include <doctest/doctest.h>

#include <fstream>
#include <string>

using namespace pushbook;
using namespace std::chrono_literals;
using test::KeyPair;
using test::signed_with;

namespace {

const auto now = std::chrono::system_clock::time_point(std::chrono::seconds(1'800'000'000));
constexpr const char* claims = R"({"sub":"alice","exp":1800003600})";

std::string header(std::string_view alg, std::string_view kid) {
  return std::string(R"({"alg":")") + std::string(alg) + R"(","typ":"JWT","kid":")" + std::string(kid) +
         R"("})";
}

// The message of the error verifying `token` with `keys`, or "ok".
std::string refusal(const std::string& token, const KeySet& keys) {
  auto r = verify_token(token, keys, now);
  if (r) return "ok";
  CHECK(r.error().is(errc::unauthorized));
  CHECK(r.error().message.find(token) == std::string::npos);  // never the token itself
  return r.error().message;
}

// The message of a failed JWKS load.
std::string jwks_error(const std::string& json) {
  KeySet keys;
  auto r = keys.add_jwks(json);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().is(errc::bad_request));
  CHECK(keys.empty());  // all or nothing
  return r.error().message;
}

void write_file(const std::string& path, const std::string& content) {
  std::ofstream(path, std::ios::binary) << content;
}

}  // namespace

TEST_CASE("HS256 keys are chosen by the token's kid") {
  KeySet keys;
  REQUIRE(keys.add_hs256("k1", "secret-one").has_value());
  REQUIRE(keys.add_hs256("k2", "secret-two").has_value());
  CHECK(keys.size() == 2);
  CHECK(keys.contains("k1"));
  CHECK_FALSE(keys.contains(""));

  auto c = verify_token(sign_token("alice", now + 1h, "secret-one", "k1"), keys, now);
  REQUIRE(c.has_value());
  CHECK(c->subject == "alice");
  CHECK(c->expires_at == now + 1h);
  CHECK(refusal(sign_token("bob", now + 1h, "secret-two", "k2"), keys) == "ok");
  // The right secret under another kid is the wrong key.
  CHECK(refusal(sign_token("alice", now + 1h, "secret-two", "k1"), keys) == "bad token signature");
  CHECK(refusal(sign_token("alice", now + 1h, "secret-one", "k3"), keys) == R"(unknown key id "k3")");
  CHECK(refusal(sign_token("alice", now + 1h, "secret-one"), keys) ==
        R"(token names no key ("kid") and there is no default key)");
  CHECK(refusal(sign_token("alice", now - 1h, "secret-one", "k1"), keys) == "token expired");
  CHECK(keys.add_hs256("k1", "again").error().message == R"(key "k1" is in the set already)");
  CHECK(keys.add_hs256("k4", "").error().message == R"(key "k4": an empty HS256 secret)");
}

TEST_CASE("the default key (no kid) is what a single secret means; a kid it does not have is refused") {
  const auto keys = KeySet::from_secret("the-secret");
  REQUIRE(keys.size() == 1);
  CHECK(keys.keys()[0].kid.empty());
  CHECK(keys.keys()[0].bits == 80);
  CHECK(keys.signing_kid() == std::optional<std::string>(""));
  const auto token = sign_token("alice", now + 1h, "the-secret");  // the old single-secret token
  CHECK(refusal(token, keys) == "ok");
  CHECK(verify_token(token, "the-secret", now).has_value());  // the secret-only call is unchanged
  CHECK(refusal(sign_token("alice", now + 1h, "the-secret", "k1"), keys) == R"(unknown key id "k1")");
  // An empty "kid" is no kid.
  CHECK(refusal(test::hs256_signed("the-secret", header("HS256", ""), claims), keys) == "ok");
  // A kid that is not a string is a malformed header.
  CHECK(refusal(test::hs256_signed("the-secret", R"({"alg":"HS256","kid":7})", claims), keys) ==
        R"(malformed token header: "kid" is not a string)");
  CHECK(KeySet::from_secret("").empty());
}

TEST_CASE(
    "rotation: both keys verify while both are in the set; once the old one is removed its tokens are "
    "refused") {
  KeySet keys;
  REQUIRE(keys.add_hs256("2024-01", "old-secret-old-secret-old-secret").has_value());
  CHECK(keys.signing_kid() == "2024-01");
  const auto old_token = sign_token("alice", now + 1h, keys).value();

  // 1. The new key joins the set and signs (the key added last signs); the old one is retired.
  REQUIRE(keys.add_hs256("2024-07", "new-secret-new-secret-new-secret").has_value());
  REQUIRE(keys.retire("2024-01").has_value());
  CHECK(keys.signing_kid() == "2024-07");
  const auto new_token = sign_token("alice", now + 1h, keys).value();
  CHECK(new_token != old_token);
  CHECK(refusal(new_token, keys) == "ok");
  CHECK(refusal(old_token, keys) == "ok");  // tokens out there still work
  CHECK(keys.keys()[0].signs == false);
  CHECK(keys.keys()[1].signs == true);

  // 2. Once the old tokens could have expired, the old key goes: a token signed with it (one
  //    kept, or forged with a leaked retired key) is refused.
  KeySet rotated = keys;
  CHECK(rotated.remove("2024-01"));
  CHECK_FALSE(rotated.remove("2024-01"));
  CHECK(refusal(old_token, rotated) == R"(unknown key id "2024-01")");
  CHECK(refusal(sign_token("mallory", now + 1h, "old-secret-old-secret-old-secret", "2024-01"), rotated) ==
        R"(unknown key id "2024-01")");
  CHECK(refusal(new_token, rotated) == "ok");
  // A copy is a set of its own: the one it was copied from still has the old key.
  CHECK(refusal(old_token, keys) == "ok");

  // Retiring every HS256 key leaves nothing to sign with.
  REQUIRE(rotated.retire("2024-07").has_value());
  CHECK_FALSE(rotated.signing_kid().has_value());
  CHECK(sign_token("alice", now + 1h, rotated).error().message == "the key set has no HS256 key that signs");
  CHECK(refusal(new_token, rotated) == "ok");  // retired keys still verify
  CHECK(rotated.retire("nope").error().message == R"(key "nope" is not in the set)");

  KeySet moved = std::move(rotated);
  CHECK(moved.size() == 1);
  CHECK(rotated.empty());  // NOLINT(bugprone-use-after-move): a moved-from set is empty
}

TEST_CASE("RS256 with an RSA public key from PEM") {
  const auto rsa = KeyPair::rsa();
  KeySet keys;
  REQUIRE(keys.add_public_key_pem("rsa-1", rsa.public_pem()).has_value());
  const auto info = keys.keys().at(0);
  CHECK(info.algorithm == TokenAlgorithm::rs256);
  CHECK(info.bits == 2048);
  CHECK_FALSE(info.signs);
  CHECK_FALSE(keys.signing_kid().has_value());

  const auto token = signed_with(rsa, header("RS256", "rsa-1"), claims);
  auto c = verify_token(token, keys, now);
  REQUIRE(c.has_value());
  CHECK(c->subject == "alice");

  // Another payload under the same signature.
  const auto dot1 = token.find('.');
  const auto dot2 = token.rfind('.');
  const auto tampered =
      token.substr(0, dot1 + 1) + test::b64url(R"({"sub":"mallory","exp":1800003600})") + token.substr(dot2);
  CHECK(refusal(tampered, keys) == "bad token signature");
  // One bit of the signature flipped.
  auto flipped = token;
  flipped[dot2 + 5] = flipped[dot2 + 5] == 'A' ? 'B' : 'A';
  CHECK(refusal(flipped, keys) == "bad token signature");
  // Signed by another RSA key.
  CHECK(refusal(signed_with(KeyPair::rsa(), header("RS256", "rsa-1"), claims), keys) ==
        "bad token signature");
  CHECK(refusal(token.substr(0, dot2 + 1), keys) == "bad token signature");
}

TEST_CASE("ES256 with a P-256 public key: r||s signatures of exactly 64 bytes") {
  const auto ec = KeyPair::ec();
  KeySet keys;
  REQUIRE(keys.add_public_key_pem("ec-1", ec.public_pem()).has_value());
  CHECK(keys.keys().at(0).algorithm == TokenAlgorithm::es256);
  CHECK(keys.keys().at(0).bits == 256);

  const auto input = test::signing_input(header("ES256", "ec-1"), claims);
  const auto der = ec.sign(input);
  const auto raw = KeyPair::der_to_raw(der);
  CHECK(refusal(input + "." + test::b64url(raw), keys) == "ok");
  // The DER form OpenSSL makes is not a JWS signature.
  CHECK(refusal(input + "." + test::b64url(der), keys) == "bad token signature");
  CHECK(refusal(input + "." + test::b64url(raw.substr(0, 63)), keys) == "bad token signature");
  CHECK(refusal(input + "." + test::b64url(raw + '\0'), keys) == "bad token signature");
  CHECK(refusal(input + "." + test::b64url(std::string(64, '\0')), keys) == "bad token signature");
  auto swapped = raw.substr(32) + raw.substr(0, 32);  // s||r
  CHECK(refusal(input + "." + test::b64url(swapped), keys) == "bad token signature");
  CHECK(refusal(signed_with(KeyPair::ec(), header("ES256", "ec-1"), claims), keys) == "bad token signature");
}

TEST_CASE("algorithm confusion is refused: the key decides the algorithm, never the token") {
  const auto rsa = KeyPair::rsa();
  const auto ec = KeyPair::ec();
  const auto pem = rsa.public_pem();
  KeySet keys;
  REQUIRE(keys.add_hs256("hs", "shared-secret").has_value());
  REQUIRE(keys.add_public_key_pem("rsa", pem).has_value());
  REQUIRE(keys.add_public_key_pem("ec", ec.public_pem()).has_value());

  // The classic attack: HS256 "signed" with the RSA key's public PEM as the HMAC secret. The
  // token is well made (a verifier that lets the token pick HMAC would accept it)...
  const auto forged = test::hs256_signed(pem, header("HS256", "rsa"), claims);
  REQUIRE(verify_token(forged, pem, now).has_value());
  // ...but the key "rsa" verifies RS256 only.
  CHECK(refusal(forged, keys) == R"(token algorithm HS256 does not match key "rsa" (RS256))");

  // The other way round: an RS256 token naming the HS256 key.
  CHECK(refusal(signed_with(rsa, header("RS256", "hs"), claims), keys) ==
        R"(token algorithm RS256 does not match key "hs" (HS256))");
  // And between the public key types.
  CHECK(refusal(signed_with(ec, header("ES256", "rsa"), claims), keys) ==
        R"(token algorithm ES256 does not match key "rsa" (RS256))");
  CHECK(refusal(signed_with(rsa, header("RS256", "ec"), claims), keys) ==
        R"(token algorithm RS256 does not match key "ec" (ES256))");

  // "none", and algorithms no key here has, never.
  const auto unsigned_token = test::b64url(header("none", "hs")) + "." + test::b64url(claims) + ".";
  CHECK(refusal(unsigned_token, keys) == "unsupported token algorithm: HS256, RS256 and ES256 are accepted");
  CHECK(refusal(test::hs256_signed("shared-secret", header("HS384", "hs"), claims), keys) ==
        "unsupported token algorithm: HS256, RS256 and ES256 are accepted");
  CHECK(refusal(test::hs256_signed("shared-secret", R"({"kid":"hs"})", claims), keys) ==
        "unsupported token algorithm: HS256, RS256 and ES256 are accepted");
  CHECK(refusal(test::hs256_signed("shared-secret", header("HS256", "hs"), claims), keys) == "ok");
}

TEST_CASE("an unknown kid is named shortened and without control characters") {
  KeySet keys;
  REQUIRE(keys.add_hs256("k", "s").has_value());
  const std::string kid = std::string("evil\\u0000\\n\\\"") + std::string(100, 'x');
  const auto message = refusal(test::hs256_signed("s", header("HS256", kid), claims), keys);
  CHECK(message == "unknown key id \"evil???" + std::string(57, 'x') + "...\"");
}

TEST_CASE("PEM: public RSA (2048 bits and more) and P-256 keys; private keys and others are refused") {
  KeySet keys;
  CHECK(keys.add_public_key_pem("priv", KeyPair::rsa().private_pem()).error().message ==
        R"(key "priv": a private key; give its public key (openssl pkey -pubout))");
  CHECK(keys.add_public_key_pem("weak", KeyPair::rsa(1024).public_pem()).error().message ==
        R"(key "weak": an RSA key of 1024 bits is too weak (2048 at least))");
  CHECK(keys.add_public_key_pem("p384", KeyPair::ec("P-384").public_pem()).error().message ==
        R"(key "p384": an EC key on curve secp384r1 (ES256 needs P-256))");
  CHECK(keys.add_public_key_pem("junk", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
            .error()
            .message == R"(key "junk": not a PEM public key (-----BEGIN PUBLIC KEY-----))");
  CHECK(keys.add_public_key_pem("", "hello").error().message ==
        "the key without kid: not a PEM public key (-----BEGIN PUBLIC KEY-----)");
  CHECK(keys.empty());

  test::TempDir dir;
  const auto ec = KeyPair::ec();
  write_file(dir.file("ec.pem"), ec.public_pem());
  REQUIRE(keys.add_public_key_file("ec", dir.file("ec.pem")).has_value());
  CHECK(refusal(signed_with(ec, header("ES256", "ec"), claims), keys) == "ok");
  CHECK(keys.add_public_key_file("ec", dir.file("ec.pem")).error().message ==
        dir.file("ec.pem") + R"(: key "ec" is in the set already)");
  CHECK(keys.add_public_key_file("x", dir.file("missing.pem")).error().message ==
        "cannot read " + dir.file("missing.pem") + ": No such file or directory");
}

TEST_CASE("JWKS: oct, RSA and EC keys by kid; encryption keys skipped; key_ops retire an oct key") {
  const auto rsa = KeyPair::rsa();
  const auto ec = KeyPair::ec();
  const std::string jwks = R"({"keys":[)" + rsa.jwk("rsa-1", R"("alg":"RS256","use":"sig",)") + "," +
                           ec.jwk("ec-1", R"("alg":"ES256",)") + "," +
                           R"({"kty":"oct","kid":"hs-old","k":")" + test::b64url("old-secret") +
                           R"(","key_ops":["verify"]},)" +
                           R"({"kty":"oct","kid":"hs-new","alg":"HS256","k":")" + test::b64url("new-secret") +
                           R"("},)" + KeyPair::rsa().jwk("enc-1", R"("use":"enc",)") + "]}";
  auto keys = KeySet::from_jwks(jwks);
  REQUIRE(keys.has_value());
  const auto info = keys->keys();
  REQUIRE(info.size() == 4);
  CHECK(info[0].kid == "rsa-1");
  CHECK(info[0].algorithm == TokenAlgorithm::rs256);
  CHECK(info[1].algorithm == TokenAlgorithm::es256);
  CHECK(info[2].algorithm == TokenAlgorithm::hs256);
  CHECK(info[2].bits == 80);
  CHECK_FALSE(info[2].signs);
  CHECK(info[3].signs);
  CHECK_FALSE(keys->contains("enc-1"));
  CHECK(keys->signing_kid() == "hs-new");

  CHECK(refusal(signed_with(rsa, header("RS256", "rsa-1"), claims), *keys) == "ok");
  CHECK(refusal(signed_with(ec, header("ES256", "ec-1"), claims), *keys) == "ok");
  CHECK(refusal(sign_token("alice", now + 1h, "old-secret", "hs-old"), *keys) == "ok");
  CHECK(refusal(sign_token("alice", now + 1h, *keys).value(), *keys) == "ok");
  CHECK(refusal(sign_token("alice", now + 1h, "new-secret", "hs-new"), *keys) == "ok");

  // From a file.
  test::TempDir dir;
  write_file(dir.file("keys.json"), jwks);
  auto loaded = KeySet::load_file(dir.file("keys.json"));
  REQUIRE(loaded.has_value());
  CHECK(loaded->size() == 4);
  CHECK(refusal(signed_with(rsa, header("RS256", "rsa-1"), claims), *loaded) == "ok");
  write_file(dir.file("bad.json"), R"({"keys":[{"kty":"oct","kid":"a"}]})");
  CHECK(KeySet::load_file(dir.file("bad.json")).error().message ==
        dir.file("bad.json") + R"(: key "a": no "k")");
  CHECK(KeySet::load_file(dir.file("none.json")).error().message ==
        "cannot read " + dir.file("none.json") + ": No such file or directory");
}

TEST_CASE("JWKS: bad documents and keys are refused whole, with a message naming the key") {
  const auto rsa = KeyPair::rsa();
  const auto ec = KeyPair::ec();
  const auto ec_jwk = ec.jwk("e");
  CHECK(jwks_error("not json").starts_with("not a JWKS: "));
  CHECK(jwks_error(R"({"kty":"oct"})") == R"(not a JWKS: no {"keys":[...]})");
  CHECK(jwks_error(R"({"keys":[7]})") == "key #1: not a JSON object");
  CHECK(jwks_error(R"({"keys":[{"kid":3,"kty":"oct","k":"c2VjcmV0"}]})") ==
        R"(key #1: "kid" is not a string)");
  CHECK(jwks_error(R"({"keys":[{"kid":"a","k":"c2VjcmV0"}]})") == R"(key "a": no "kty")");
  CHECK(jwks_error(R"({"keys":[{"kid":"ed","kty":"OKP","crv":"Ed25519","x":"AAAA"}]})") ==
        R"(key "ed": unsupported key type "OKP" (oct, RSA and EC are))");
  CHECK(jwks_error(
            R"({"keys":[{"kid":"a","kty":"oct","k":"c2VjcmV0"},{"kid":"a","kty":"oct","k":"b3RoZXI"}]})") ==
        R"(key "a" is in the set already)");
  CHECK(jwks_error(R"({"keys":[{"kty":"oct","k":"c2VjcmV0"},{"kty":"oct","k":"b3RoZXI"}]})") ==
        "the key without kid is in the set already");
  CHECK(jwks_error(R"({"keys":[{"kid":"a","kty":"oct","k":"c2Vj*mV0"}]})") ==
        R"(key "a": "k" is not base64url)");
  CHECK(jwks_error(R"({"keys":[{"kid":"a","kty":"oct","k":""}]})") == R"(key "a": "k" is not base64url)");
  CHECK(jwks_error(R"({"keys":[{"kid":"a","kty":"oct","k":5}]})") == R"(key "a": "k" is not a string)");
  CHECK(jwks_error(R"({"keys":[{"kid":"a","kty":"oct","alg":"HS512","k":"c2VjcmV0"}]})") ==
        R"(key "a": unsupported algorithm "HS512" (oct keys verify HS256))");
  CHECK(jwks_error(R"({"keys":[{"kid":"a","kty":"oct","key_ops":"verify","k":"c2VjcmV0"}]})") ==
        R"(key "a": "key_ops" is not an array)");

  // RSA: both numbers, RS256 only, public only.
  auto without = [](std::string jwk, const std::string& member) {  // removes ,"member":"..."
    const auto at = jwk.find(",\"" + member + "\":\"");
    const auto end = jwk.find('"', at + member.size() + 5);
    return jwk.erase(at, end - at + 1);
  };
  CHECK(jwks_error(R"({"keys":[)" + without(rsa.jwk("r"), "e") + "]}") == R"(key "r": no "e")");
  CHECK(jwks_error(R"({"keys":[)" + rsa.jwk("r", R"("alg":"RS384",)") + "]}") ==
        R"(key "r": unsupported algorithm "RS384" (RSA keys verify RS256))");
  CHECK(jwks_error(R"({"keys":[)" + rsa.jwk("r", R"("d":"AQAB",)") + "]}") ==
        R"(key "r": a private key; a key set holds public keys (and HS256 secrets))");
  CHECK(jwks_error(R"({"keys":[{"kid":"r","kty":"RSA","n":"AQAB","e":"AQAB"}]})") ==
        R"(key "r": an RSA key of 17 bits is too weak (2048 at least))");

  // EC: P-256 only, 32-byte coordinates of a point on the curve.
  auto replaced = [](std::string text, const std::string& from, const std::string& to) {
    return text.replace(text.find(from), from.size(), to);
  };
  CHECK(jwks_error(R"({"keys":[)" + replaced(ec_jwk, "P-256", "P-384") + "]}") ==
        R"(key "e": curve "P-384" is not supported (ES256 needs P-256))");
  CHECK(jwks_error(R"({"keys":[)" + replaced(ec_jwk, R"("crv":"P-256",)", "") + "]}") ==
        R"(key "e": no "crv")");
  CHECK(jwks_error(R"({"keys":[)" + without(ec_jwk, "y") + "]}") == R"(key "e": no "y")");
  CHECK(jwks_error(R"({"keys":[)" + replaced(ec_jwk, R"("x":")", R"("x":"AAAA)") + "]}") ==
        R"(key "e": "x" and "y" of a P-256 key are 32 bytes each)");
  CHECK(jwks_error(R"({"keys":[)" + replaced(ec_jwk, R"("x":")", R"("x":"!)") + "]}") ==
        R"(key "e": "x" is not base64url)");
  const std::string zeros = test::b64url(std::string(32, '\0'));
  CHECK(jwks_error(R"({"keys":[{"kid":"e","kty":"EC","crv":"P-256","x":")" + zeros + R"(","y":")" + zeros +
                   R"("}]})") == R"(key "e": not a valid EC key)");

  // A bad key after good ones: nothing is added.
  CHECK(jwks_error(R"({"keys":[{"kid":"a","kty":"oct","k":"c2VjcmV0"},)" + rsa.jwk("r", R"("alg":"PS256",)") +
                   "]}") == R"(key "r": unsupported algorithm "PS256" (RSA keys verify RS256))");
  // A set with nothing to verify with is no set.
  CHECK(KeySet::from_jwks(R"({"keys":[)" + rsa.jwk("r", R"("use":"enc",)") + "]}").error().message ==
        "the JWKS has no key to verify tokens with (every key was skipped)");
  CHECK(KeySet::from_jwks(R"({"keys":[]})").error().message ==
        "the JWKS has no key to verify tokens with (every key was skipped)");
}
