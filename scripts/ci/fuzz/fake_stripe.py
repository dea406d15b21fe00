"""A minimal Stripe API stand-in for the fuzzing run (scripts/ci/fuzz.sh).

Answers what `POST /api/v1/tokens/purchases` calls: create and read a
PaymentIntent; and what payout onboarding calls (`POST /api/v1/me/payout-account`):
create an Express account, mint an account link (the Connect fake of the Rust
tests is the faithful one; this only lets the fuzzer reach the handler). Honours `Idempotency-Key` like Stripe (same key, same
object), so a fuzzer's retries behave as in production. Only the base URL
differs from a real deployment (STRIPE_API_BASE); the client code is the
same. Standard library only.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

LOCK = threading.Lock()
BY_KEY = {}
BY_ID = {}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        form = dict(parse_qsl(self.rfile.read(length).decode()))
        key = self.headers.get("Idempotency-Key")
        path = self.path.rstrip("/")
        if path == "/v1/accounts":
            with LOCK:
                if key and key in BY_KEY:
                    return self.reply(200, BY_KEY[key])
                account = {
                    "id": f"acct_fuzz{len(BY_KEY) + len(BY_ID) + 1:08d}",
                    "object": "account",
                    "type": form.get("type", "express"),
                    "details_submitted": False,
                    "payouts_enabled": False,
                    "capabilities": {"transfers": "inactive"},
                    "requirements": {"currently_due": ["external_account"], "past_due": [],
                                     "eventually_due": [], "current_deadline": None,
                                     "disabled_reason": "requirements.past_due"},
                }
                if key:
                    BY_KEY[key] = account
            return self.reply(200, account)
        if path == "/v1/account_links":
            return self.reply(200, {
                "object": "account_link",
                "url": f"https://connect.stripe.test/setup/e/{form.get('account', '')}/fuzz",
                "created": 1764460800,
                "expires_at": 1764461100,
            })
        if path != "/v1/payment_intents":
            return self.reply(404, {"error": {"type": "invalid_request_error"}})
        with LOCK:
            if key and key in BY_KEY:
                return self.reply(200, BY_KEY[key])
            n = len(BY_ID) + 1
            intent = {
                "id": f"pi_fuzz{n:08d}",
                "object": "payment_intent",
                "status": "requires_payment_method",
                "amount": int(form.get("amount", "0")),
                "currency": form.get("currency", "usd"),
                "client_secret": f"pi_fuzz{n:08d}_secret_fuzz",
                "metadata": {
                    k[len("metadata["):-1]: v
                    for k, v in form.items()
                    if k.startswith("metadata[")
                },
                "latest_charge": None,
            }
            BY_ID[intent["id"]] = intent
            if key:
                BY_KEY[key] = intent
        self.reply(200, intent)

    def do_GET(self):
        parts = self.path.strip("/").split("/")
        if len(parts) == 3 and parts[:2] == ["v1", "payment_intents"] and parts[2] in BY_ID:
            return self.reply(200, BY_ID[parts[2]])
        self.reply(404, {"error": {"type": "invalid_request_error"}})


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.serve_forever()
