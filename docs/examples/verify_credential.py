"""Verify a credential toolgate minted for your tool (docs/credentials.md).

    python verify_credential.py JWKS_URL ISSUER AUDIENCE TOKEN

Prints the claims and exits 0 when the token is valid for this tool; else prints why and
exits 1. Needs PyJWT with its crypto extra (`pip install "pyjwt[crypto]"`).
"""
import json
import sys

import jwt


def verify(token: str, jwks_url: str, issuer: str, audience: str) -> dict:
    header = jwt.get_unverified_header(token)
    if header.get("typ") != "at+jwt":  # RFC 9068: an access token, not an ID token
        raise jwt.InvalidTokenError(f"typ is {header.get('typ')!r}, not at+jwt")
    key = jwt.PyJWKClient(jwks_url).get_signing_key_from_jwt(token)
    return jwt.decode(
        token,
        key.key,
        algorithms=["ES256"],  # never take the algorithm from the token
        issuer=issuer,
        audience=audience,  # this tool's own audience, one value
        options={"require": ["exp", "iat", "nbf", "jti", "scope"]},
        leeway=5,
    )


if __name__ == "__main__":
    jwks_url, issuer, audience, token = sys.argv[1:5]
    try:
        claims = verify(token, jwks_url, issuer, audience)
    except jwt.PyJWTError as e:
        print(f"refused: {e}")
        sys.exit(1)
    print(json.dumps(claims, sort_keys=True))
