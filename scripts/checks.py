"""The tally of scripts/test_sweep.py and scripts/test_study_report.py: check() prints one line per
condition and counts it, summary() prints 'N passed, M failed' and gives the exit status."""
passed, failed = 0, 0


def check(cond, what, detail=""):
    """'ok   what', or 'FAIL what' with detail on the next line; returns cond."""
    global passed, failed
    if cond:
        passed += 1
        print(f"ok   {what}")
    else:
        failed += 1
        print(f"FAIL {what}" + (f"\n     {detail}" if detail else ""))
    return cond


def summary():
    """Prints the counts; 1 if any check failed, else 0."""
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0
