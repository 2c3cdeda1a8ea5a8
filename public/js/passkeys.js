// Passkeys (WebAuthn) for secure_app: the only script on the site.
//
// Loaded with Subresource Integrity from the pages that offer a passkey. It
// does two things and nothing else:
// 1. where the browser can do WebAuthn, it enables the passkey buttons
//    (disabled in the HTML, with a note saying why) and updates their note;
// 2. on a ceremony page (form#passkey-ceremony, options from the server in
//    data-options), it asks the browser for the passkey and posts the answer
//    as the form field "credential", with the page's CSRF token.
// No inline code, no eval, no fetch: the CSP allows this file and nothing more.
"use strict";

(() => {
  const supported =
    typeof window.PublicKeyCredential === "function" &&
    typeof PublicKeyCredential.parseCreationOptionsFromJSON === "function" &&
    typeof PublicKeyCredential.parseRequestOptionsFromJSON === "function";

  const MESSAGES = {
    NotAllowedError: "The passkey was not used: the request was cancelled or timed out.",
    InvalidStateError: "This device already holds a passkey for your account.",
    SecurityError: "This browser refused: the site must be opened at its own address.",
  };

  function enableButtons() {
    for (const button of document.querySelectorAll("button[data-passkey-start]")) {
      button.disabled = false;
    }
    for (const note of document.querySelectorAll("[data-passkey-note]")) {
      note.textContent = note.dataset.ready;
    }
  }

  async function ceremony(form) {
    const button = form.querySelector("#passkey-continue");
    const error = form.querySelector("#passkey-error");
    button.disabled = true;
    error.hidden = true;
    try {
      const options = JSON.parse(form.dataset.options);
      let credential;
      if (form.dataset.ceremony === "create") {
        const publicKey = PublicKeyCredential.parseCreationOptionsFromJSON(options);
        credential = await navigator.credentials.create({ publicKey });
      } else {
        const publicKey = PublicKeyCredential.parseRequestOptionsFromJSON(options);
        credential = await navigator.credentials.get({ publicKey });
      }
      form.elements.credential.value = JSON.stringify(credential.toJSON());
      form.submit();
    } catch (problem) {
      error.textContent =
        (MESSAGES[problem.name] || "The passkey could not be used.") + " You can try again.";
      error.hidden = false;
      button.textContent = "Try again";
      button.disabled = false;
    }
  }

  if (!supported) {
    return; // the buttons stay disabled, and their notes say why
  }
  enableButtons();
  const form = document.getElementById("passkey-ceremony");
  if (form) {
    form.querySelector("#passkey-continue").addEventListener("click", () => ceremony(form));
    ceremony(form); // the person just asked for it on the page before
  }
})();
