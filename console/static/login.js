// billcore console: the login. SCRAM-SHA-256 (docs/protocol.md §6.1, §7) runs here,
// in the browser, with WebCrypto: the password never leaves this page. The console
// only relays the steps to the core; this script checks the core's signature.
"use strict";
(function () {
  var enc = new TextEncoder();

  function b64(bytes) {
    var text = "";
    for (var i = 0; i < bytes.length; i++) text += String.fromCharCode(bytes[i]);
    return btoa(text);
  }
  function unb64(text) {
    var raw = atob(text), out = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
    return out;
  }
  async function hmac(key, message) {
    var k = await crypto.subtle.importKey("raw", key, { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
    return new Uint8Array(await crypto.subtle.sign("HMAC", k, message));
  }
  async function sha256(data) {
    return new Uint8Array(await crypto.subtle.digest("SHA-256", data));
  }
  function xor(a, b) {
    var out = new Uint8Array(a.length);
    for (var i = 0; i < a.length; i++) out[i] = a[i] ^ b[i];
    return out;
  }
  function same(a, b) {           // no early exit: compare every byte
    if (a.length !== b.length) return false;
    var diff = 0;
    for (var i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
    return diff === 0;
  }

  // {proof, serverSignature} for kind:login, the password and the exchange's values
  async function scram(kind, login, password, cnonce, nonce, salt, iterations) {
    if (!(iterations >= 1 && iterations <= 10000000)) throw new Error("iterations");
    var pw = await crypto.subtle.importKey("raw", enc.encode(password.normalize("NFKC")), "PBKDF2", false,
                                           ["deriveBits"]);
    var salted = new Uint8Array(await crypto.subtle.deriveBits(
      { name: "PBKDF2", hash: "SHA-256", salt: salt, iterations: iterations }, pw, 256));
    var clientKey = await hmac(salted, enc.encode("Client Key"));
    var storedKey = await sha256(clientKey);
    var serverKey = await hmac(salted, enc.encode("Server Key"));
    var user = (kind + ":" + login).replace(/=/g, "=3D").replace(/,/g, "=2C");
    var c = b64(cnonce), r = c + b64(nonce);
    var message = enc.encode("n=" + user + ",r=" + c + ",r=" + r + ",s=" + b64(salt) + ",i=" + iterations +
                             ",c=biws,r=" + r);
    return { proof: xor(clientKey, await hmac(storedKey, message)),
             serverSignature: await hmac(serverKey, message) };
  }
  window.billcoreScram = { scram: scram, b64: b64, unb64: unb64 };   // the tests check it against §6.2

  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("login-form");
    if (!form) return;
    var otpForm = document.getElementById("otp-form");
    var error = document.getElementById("login-error");
    var csrf = form.querySelector("input[name=csrf]").value;
    var next = form.getAttribute("data-next") || "/";
    var query = "?next=" + encodeURIComponent(next);

    function say(text) {
      error.textContent = text;
      error.classList.remove("hidden");
    }
    async function post(path, body) {
      var response = await fetch(path + query, {
        method: "POST", credentials: "same-origin", cache: "no-store",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify(body) });
      var answer = {};
      try { answer = await response.json(); } catch (e) { answer = {}; }
      if (!response.ok) throw new Error(answer.message || form.getAttribute("data-failed"));
      return answer;
    }
    function busy(button, on) {
      button.disabled = on;
    }

    form.addEventListener("submit", async function (event) {
      event.preventDefault();
      error.classList.add("hidden");
      if (!window.crypto || !crypto.subtle) { say(form.getAttribute("data-insecure")); return; }
      var button = document.getElementById("login-submit");
      var passwordField = document.getElementById("password");
      var login = document.getElementById("login").value.trim();
      busy(button, true);
      try {
        var cnonce = crypto.getRandomValues(new Uint8Array(16));
        var challenge = await post("/login/start", { login: login, cnonce: b64(cnonce) });
        var keys = await scram("admin", login, passwordField.value, cnonce, unb64(challenge.nonce),
                               unb64(challenge.salt), challenge.iter);
        passwordField.value = "";
        var answer = await post("/login/proof", { proof: b64(keys.proof) });
        if (!same(unb64(answer.sig), keys.serverSignature)) {
          // not the core that holds this operator's verifier: do not stay logged in there
          if (answer.csrf) {
            await fetch("/logout", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": answer.csrf } });
          }
          say(form.getAttribute("data-server"));
          return;
        }
        if (answer.otp_required) {
          form.classList.add("hidden");
          otpForm.classList.remove("hidden");
          document.getElementById("otp-code").focus();
          return;
        }
        window.location.assign(answer.next || "/");
      } catch (e) {
        say(e.message || form.getAttribute("data-wrong"));
      } finally {
        busy(button, false);
      }
    });

    otpForm.addEventListener("submit", async function (event) {
      event.preventDefault();
      error.classList.add("hidden");
      var button = document.getElementById("otp-submit");
      busy(button, true);
      try {
        var answer = await post("/login/otp", { code: document.getElementById("otp-code").value.trim() });
        window.location.assign(answer.next || "/");
      } catch (e) {
        say(e.message);
      } finally {
        busy(button, false);
      }
    });
  });
})();
