"""Entry point: ``uv run streamlit run streamlit_app.py``.

Page config and navigation only; each page in ``pages/`` stays thin and starts with ``ui.state.page_setup()``.
"""

import streamlit as st

from ui.state import DEEP_LINK, ENTERED

st.set_page_config(
    page_title="Chest X-ray pneumonia screening (research)",
    page_icon=":material/radiology:",
    layout="wide",
    menu_items={"About": "Open pneumonia-screening dashboard for chest X-rays. Research/education tool, not a medical device."},
)

pages = {
    "diagnose.py": st.Page("pages/diagnose.py", title="Diagnose", icon=":material/radiology:", default=True),
    "report.py": st.Page("pages/report.py", title="Model report", icon=":material/monitoring:"),
}
st.session_state[ENTERED] = True
page = st.navigation(list(pages.values()))
if (wanted := st.session_state.pop(DEEP_LINK, None)) in pages:  # a first visit's link to a page (ui.state.page_setup)
    st.switch_page(pages[wanted])
page.run()  # each page renders the shared sidebar via ui.state.page_setup()
