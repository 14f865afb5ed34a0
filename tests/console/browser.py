"""Drives the operator console in Debian's Chromium (Playwright, no browser download):
signs in, reads the pending approval, approves it with a note, keeps a screenshot. Prints
one JSON object. Usage: browser.py CONSOLE_URL ADMIN_TOKEN SCREENSHOT_PATH
"""
import json
import sys

from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(url, token, screenshot):
    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        out["login_title"] = page.title()
        page.fill("input[name=token]", token)
        page.click("button:has-text('Sign in')")
        page.wait_for_selector("article.approval")
        approval = page.locator("article.approval").first
        out["action"] = approval.locator("h3").inner_text()
        out["args"] = approval.locator("pre.args").inner_text()
        out["reason"] = approval.locator("p.reason").inner_text()
        # An agent's words are text: no element of theirs, no script of theirs ran.
        out["injected_elements"] = page.locator("article.approval pre.args img, article.approval pre.args script").count()
        out["xss"] = page.evaluate("() => window.__xss === undefined ? null : window.__xss")
        page.screenshot(path=screenshot.replace(".png", "-pending.png"), full_page=True)
        form = approval.locator("form[action$='/approve']")
        form.locator("input[name=approver]").fill("carol")
        form.locator("input[name=note]").fill("customer called back")
        form.locator("button.approve").click()
        page.wait_for_load_state("load")
        out["pending_after"] = page.locator("article.approval").count()
        out["decisions"] = page.locator("#decision-rows tr").count()
        page.screenshot(path=screenshot, full_page=True)
        out["page_errors"] = errors
        browser.close()
    print(json.dumps(out))


main(sys.argv[1], sys.argv[2], sys.argv[3])
