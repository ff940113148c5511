// Test helper: what an identity provider does with its keys, done with OpenSSL directly (not with
// pushbook's code): RSA and EC P-256 key pairs, their public PEM and JWK, and tokens signed with
// them (RS256, and ES256 with the JWS r||s signature).
#pragma once

#include <doctest/doctest.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace pushbook::test {

inline std::string b64url(std::string_view in) {
  static constexpr char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  std::string out;
  std::uint32_t bits = 0;
  int count = 0;
  for (unsigned char c : in) {
    bits = (bits << 8) | c;
    count += 8;
    while (count >= 6) out += alphabet[(bits >> (count -= 6)) & 0x3F];
  }
  if (count > 0) out += alphabet[(bits << (6 - count)) & 0x3F];
  return out;
}

/// A key pair made with OpenSSL, freed with the object.
class KeyPair {
 public:
  /// An RSA key of `bits` bits.
  static KeyPair rsa(unsigned bits = 2048) {
    return KeyPair(EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", static_cast<std::size_t>(bits)));
  }
  /// An EC key on `curve` ("P-256", "P-384").
  static KeyPair ec(const char* curve = "P-256") {
    return KeyPair(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", curve));
  }

  EVP_PKEY* get() const { return key_.get(); }

  /// The public key as "-----BEGIN PUBLIC KEY-----" PEM.
  std::string public_pem() const { return pem(false); }
  /// The private key as PKCS#8 PEM.
  std::string private_pem() const { return pem(true); }

  /// The public key as a JWK (JSON text) with `kid` and `extra` members ("\"alg\":\"RS256\"," ...).
  std::string jwk(std::string_view kid, std::string_view extra = "") const {
    std::string out = "{" + std::string(extra) + "\"kid\":\"" + std::string(kid) + "\",";
    if (EVP_PKEY_is_a(get(), "RSA"))
      return out + "\"kty\":\"RSA\",\"n\":\"" + b64url(bn_param(OSSL_PKEY_PARAM_RSA_N, 0)) + "\",\"e\":\"" +
             b64url(bn_param(OSSL_PKEY_PARAM_RSA_E, 0)) + "\"}";
    return out + "\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"" +
           b64url(bn_param(OSSL_PKEY_PARAM_EC_PUB_X, 32)) + "\",\"y\":\"" +
           b64url(bn_param(OSSL_PKEY_PARAM_EC_PUB_Y, 32)) + "\"}";
  }

  /// The signature of `data` with SHA-256: PKCS#1 v1.5 for RSA, DER ECDSA-Sig-Value for EC.
  std::string sign(std::string_view data) const {
    std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
    REQUIRE(EVP_DigestSignInit(ctx.get(), nullptr, EVP_sha256(), nullptr, get()) == 1);
    std::size_t size = 0;
    const auto* in = reinterpret_cast<const unsigned char*>(data.data());
    REQUIRE(EVP_DigestSign(ctx.get(), nullptr, &size, in, data.size()) == 1);
    std::string out(size, '\0');
    REQUIRE(EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(out.data()), &size, in, data.size()) ==
            1);
    out.resize(size);
    return out;
  }

  /// An EC signature converted from DER to the JWS form, r||s with 32 bytes each.
  static std::string der_to_raw(std::string_view der) {
    const auto* p = reinterpret_cast<const unsigned char*>(der.data());
    std::unique_ptr<ECDSA_SIG, decltype(&ECDSA_SIG_free)> sig(
        d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(der.size())), ECDSA_SIG_free);
    REQUIRE(sig);
    std::string raw(64, '\0');
    auto* out = reinterpret_cast<unsigned char*>(raw.data());
    REQUIRE(BN_bn2binpad(ECDSA_SIG_get0_r(sig.get()), out, 32) == 32);
    REQUIRE(BN_bn2binpad(ECDSA_SIG_get0_s(sig.get()), out + 32, 32) == 32);
    return raw;
  }

 private:
  explicit KeyPair(EVP_PKEY* key) : key_(key, EVP_PKEY_free) { REQUIRE(key_); }

  std::string pem(bool private_key) const {
    std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new(BIO_s_mem()), BIO_free);
    REQUIRE((private_key ? PEM_write_bio_PrivateKey(bio.get(), get(), nullptr, nullptr, 0, nullptr, nullptr)
                         : PEM_write_bio_PUBKEY(bio.get(), get())) == 1);
    char* data = nullptr;
    const long size = BIO_get_mem_data(bio.get(), &data);
    return std::string(data, static_cast<std::size_t>(size));
  }

  // A big-number parameter, big-endian, left-padded to `width` bytes (0: as short as it goes).
  std::string bn_param(const char* name, int width) const {
    BIGNUM* bn = nullptr;
    REQUIRE(EVP_PKEY_get_bn_param(get(), name, &bn) == 1);
    std::string out(static_cast<std::size_t>(width ? width : BN_num_bytes(bn)), '\0');
    BN_bn2binpad(bn, reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(out.size()));
    BN_free(bn);
    return out;
  }

  std::shared_ptr<EVP_PKEY> key_;
};

/// header "." claims, both base64url-encoded: what a JWS signature covers.
inline std::string signing_input(std::string_view header_json, std::string_view claims_json) {
  return b64url(header_json) + "." + b64url(claims_json);
}

inline std::string hmac_sha256(std::string_view secret, std::string_view data) {
  unsigned char mac[32];
  unsigned int size = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
       reinterpret_cast<const unsigned char*>(data.data()), data.size(), mac, &size);
  return std::string(reinterpret_cast<const char*>(mac), size);
}

/// A JWT with this header and these claims signed by `key`: RS256 for an RSA key, ES256 (r||s)
/// for an EC key.
inline std::string signed_with(const KeyPair& key, std::string_view header_json,
                               std::string_view claims_json) {
  const auto input = signing_input(header_json, claims_json);
  auto signature = key.sign(input);
  if (EVP_PKEY_is_a(key.get(), "EC")) signature = KeyPair::der_to_raw(signature);
  return input + "." + b64url(signature);
}

/// A JWT with this header and these claims, HMAC-SHA256 with `secret`.
inline std::string hs256_signed(std::string_view secret, std::string_view header_json,
                                std::string_view claims_json) {
  const auto input = signing_input(header_json, claims_json);
  return input + "." + b64url(hmac_sha256(secret, input));
}

}  // namespace pushbook::test
