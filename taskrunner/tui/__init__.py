"""`taskrun top`: the live terminal dashboard.

    view.py     pure: the filter's words -> a StatusQuery, records -> table rows, sorting
    source.py   I/O: what the running daemon says (control socket), the Runs' records and output
    app.py      the Textual app; the only module that imports Textual

The app never touches the socket or the files on its own thread: source.py
runs in Textual thread workers and hands plain data back.
"""
