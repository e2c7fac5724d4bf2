"""The Gradio app's tabs: Plan (ui/plan.py), Train (ui/train.py) and Dry run (ui/dryrun.py).

Each tab module holds plain handler functions first (widget values in, figures and tables out,
tested without a browser) and one `create_*_tab` function with its layout and events.
"""
