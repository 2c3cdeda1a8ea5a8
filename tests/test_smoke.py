def test_pages(client):
    assert client.get("/").status_code == 200
    assert client.get("/second").status_code == 200


def test_journey(logged_in):
    page = logged_in.get("/account-details")
    assert page.status_code == 200
    assert b"Logged in as" in page.data
